"""Unit tests: pure functions and in-process module tests (no server, node, browser, Orthanc, Ray or training)."""
