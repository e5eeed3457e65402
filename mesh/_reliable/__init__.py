"""At-least-once delivery on top of the spool:
the sender's outbox, the receiver's dedup, durables.
"""
