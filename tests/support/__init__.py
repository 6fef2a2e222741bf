"""Helpers shared by the tests that run real ``bastion serve`` processes."""
