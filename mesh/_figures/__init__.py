"""What a node reports about itself (its figures) and how the mesh's are gathered.

`_rates` turns running counters into per-second counts; `_report` is the
wire form of one node's figures; `_own` keeps them and answers the internal
figures service every node serves; `_mesh` asks every peer and merges.
"""
