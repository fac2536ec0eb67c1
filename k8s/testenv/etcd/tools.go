//go:build tools

// Package tools pins the etcd server that the local test cluster runs. Its own go.mod
// replaces sibling modules with local folders, so it cannot be `go install`ed directly;
// this module requires it and points those replacements at the published versions.
package tools

import _ "go.etcd.io/etcd/server/v3"
