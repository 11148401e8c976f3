"""Benchmarks (never run by the tests except at tiny sizes): sampling speed and memory."""
