"""Simulated WebRTC peers for tests and load tests."""
