"""Local Kubernetes test bed: a real control plane, kwok nodes and a simulated kubelet.

Tests, the demo and the benchmarks share this package, so they all exercise imgcache
against the same real kube-apiserver, etcd, controller-manager and scheduler.
"""
