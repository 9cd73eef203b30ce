// How a Go receiver reads a request's parameters: Request.ParseMultipartForm (which calls
// ParseForm) over the query, an urlencoded body or multipart/form-data parts, as FormValue and
// FormFile see them. Usage: goform URL CONTENT_TYPE BODY_FILE
// Prints one name per line, sorted (values never); exit 1 when Go cannot read the form.
package main

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"sort"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: goform URL CONTENT_TYPE BODY_FILE")
		os.Exit(2)
	}
	body, err := os.ReadFile(os.Args[3])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	req, err := http.NewRequest("POST", os.Args[1], bytes.NewReader(body))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	req.Header.Set("Content-Type", os.Args[2])
	if err := req.ParseMultipartForm(1 << 20); err != nil && err != http.ErrNotMultipart {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var names []string
	for name := range req.Form {
		names = append(names, name)
	}
	if req.MultipartForm != nil {
		for name := range req.MultipartForm.File {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Println(name)
	}
}
