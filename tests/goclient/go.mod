module consentproxy/goclient

go 1.19
