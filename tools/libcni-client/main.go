// Command libcni-client runs one CNI operation on a network configuration list through
// libcni, the library container runtimes (containerd's go-cni, podman, cnitool) build on.
//
// Theory of operation: it loads a .conflist, builds a libcni RuntimeConf from its flags
// (container id, netns path, ifname, CNI_ARGS pairs and CAP_ARGS as JSON, e.g.
// {"portMappings":[...],"bandwidth":{...}}), and calls AddNetworkList, CheckNetworkList or
// DelNetworkList. libcni then does what a runtime relies on: it injects only the
// capability args a plugin declares in "capabilities" into its runtimeConfig, chains
// prevResult from plugin to plugin, caches the ADD result under -cache-dir and hands the
// cached result to CHECK and DEL. ADD prints the final result as JSON on stdout; CHECK and
// DEL print nothing. Errors go to stderr with exit status 1 (2 for bad usage).
//
// It is built offline against Debian's golang-github-appc-cni-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off go build -o BIN ./tools/libcni-client
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "libcni-client: "+format+"\n", args...)
	os.Exit(code)
}

func main() {
	conflist := flag.String("conflist", "", "path of the network configuration list (required)")
	binDirs := flag.String("bin-dir", "/usr/lib/cni", "plugin directories, colon-separated (CNI_PATH)")
	cacheDir := flag.String("cache-dir", "", "libcni result cache directory (default: libcni's)")
	containerID := flag.String("container-id", "", "container id (required)")
	netns := flag.String("netns", "", "network namespace path (required for add and check)")
	ifname := flag.String("ifname", "eth0", "interface name in the namespace")
	capArgs := flag.String("cap-args", "", `capability args as a JSON object, e.g. {"portMappings":[...]}`)
	cniArgs := flag.String("args", "", "CNI_ARGS as K=V;K=V")
	timeout := flag.Duration("timeout", 60*time.Second, "deadline for the whole operation")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: libcni-client [flags] add|check|del\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	op := flag.Arg(0)
	if op != "add" && op != "check" && op != "del" {
		fail(2, "unknown operation %q; expected add, check or del", op)
	}
	if *conflist == "" || *containerID == "" {
		fail(2, "-conflist and -container-id are required")
	}
	if *netns == "" && op != "del" {
		fail(2, "-netns is required for %s", op)
	}

	list, err := libcni.ConfListFromFile(*conflist)
	if err != nil {
		fail(1, "cannot load %s: %v", *conflist, err)
	}
	rt := &libcni.RuntimeConf{
		ContainerID: *containerID,
		NetNS:       *netns,
		IfName:      *ifname,
		CacheDir:    *cacheDir,
	}
	if *capArgs != "" {
		if err := json.Unmarshal([]byte(*capArgs), &rt.CapabilityArgs); err != nil {
			fail(2, "-cap-args is not a JSON object: %v", err)
		}
	}
	if *cniArgs != "" {
		for _, kv := range strings.Split(*cniArgs, ";") {
			parts := strings.SplitN(kv, "=", 2)
			if len(parts) != 2 {
				fail(2, "-args entry %q is not K=V", kv)
			}
			rt.Args = append(rt.Args, [2]string{parts[0], parts[1]})
		}
	}

	cni := libcni.NewCNIConfigWithCacheDir(strings.Split(*binDirs, ":"), *cacheDir, nil)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	switch op {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(1, "ADD %s on %s: %v", list.Name, *containerID, err)
		}
		if err := result.Print(); err != nil {
			fail(1, "cannot print the result: %v", err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail(1, "CHECK %s on %s: %v", list.Name, *containerID, err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail(1, "DEL %s on %s: %v", list.Name, *containerID, err)
		}
	}
}
