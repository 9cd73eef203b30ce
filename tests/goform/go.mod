module consentproxy/goform

go 1.19
