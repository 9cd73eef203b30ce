// A client that behaves like Mattermost's: Go's net/http DefaultClient, configured only by
// HTTPS_PROXY and SSL_CERT_FILE. Usage: goclient METHOD URL [BODY_FILE]
// Prints "STATUS PROTO" on success; on failure, the error on stderr and exit 1.
package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: goclient METHOD URL [BODY_FILE]")
		os.Exit(2)
	}
	var body io.Reader
	if len(os.Args) > 3 {
		data, err := os.ReadFile(os.Args[3])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		body = bytes.NewReader(bytes.TrimRight(data, "\n"))
	}
	req, err := http.NewRequest(os.Args[1], os.Args[2], body)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	fmt.Printf("%d %s\n", resp.StatusCode, resp.Proto)
}
