"""Topic fan-out:
batching publishes to every peer, dispatching received batches to subscriptions.
"""
