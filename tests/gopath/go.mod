module consentproxy/gopath

go 1.19
