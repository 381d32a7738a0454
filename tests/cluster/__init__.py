"""Tests that run against the local control plane (marker ``cluster``)."""
