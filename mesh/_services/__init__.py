"""Named services:
serving requests with a handler, and making requests with timeouts and failover.
"""
