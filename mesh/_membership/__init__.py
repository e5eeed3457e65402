"""Who is in the mesh:
identity, the peer table, the control channel (hello, heartbeats, bye), peer events.
"""
