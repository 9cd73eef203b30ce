// How a Go receiver routes a request path: url.ParseRequestURI decodes it into URL.Path, and
// net/http's ServeMux (like gorilla/mux, Mattermost's router) routes on cleanPath(URL.Path).
// Reads one request-target per line on stdin; prints the routed path, or "ERROR" when Go
// refuses the target, one line each.
package main

import (
	"bufio"
	"fmt"
	"net/url"
	"os"
	"path"
)

// cleanPath is net/http's: path.Clean, keeping a trailing slash.
func cleanPath(p string) string {
	if p == "" {
		return "/"
	}
	if p[0] != '/' {
		p = "/" + p
	}
	np := path.Clean(p)
	if p[len(p)-1] == '/' && np != "/" {
		np += "/"
	}
	return np
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		u, err := url.ParseRequestURI(in.Text())
		if err != nil {
			fmt.Println("ERROR")
			continue
		}
		fmt.Println(cleanPath(u.Path))
	}
}
