// pause holds a Pod's namespaces open for as long as the Pod lives: the
// sandbox ("infra") container every kubelet starts first. As PID 1 of the
// Pod's PID namespace it also reaps orphaned children, and it exits on
// SIGINT or SIGTERM so that stopping the sandbox is quick.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		os.Stdout.WriteString("pause (clusterapp test bed)\n")
		return
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s == syscall.SIGCHLD {
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
