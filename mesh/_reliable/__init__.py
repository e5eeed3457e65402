"""At-least-once delivery on top of the spool: the sender's outbox, the receiver's dedup,
durables.

Glossary — the words the delivery path uses, each for one thing:

- **spooled**: on disk in the sender's outbox (`_outbox.Outbox`); a reliable send
  returns only then.
- **tracked**: the outbox's entry for a spooled message (`Tracked`): its spool id
  and the destinations (queues, durables) it still has to reach.
- **in flight**: sent to a worker and not yet consumed (`_work._target.Target`).
- **consumed**: the application is done with a message — ``msg.ack()``,
  ``msg.nack()``, asking for the next one, or its handler returning.
- **receipt**: where ``msg.ack()``/``msg.nack()`` of a handed-out message go (attached
  by the `Pull` that handed it out; not a field of the message).
- **ack / nack**: the application's verdict: processed, or failed (a reliable
  message is then sent again later, after ``max_attempts`` dead-lettered).
- **credit**: the worker's running count of consumed messages of one pusher stream,
  sent back with the window it grants (`_work._credit`); a credit settles the oldest
  in flight, in order.
- **settle**: act on a consumed message's verdict — the `Settle` protocol on the
  worker side, `Target.consume` on the pusher side.
- **delivered**: a destination consumed a reliable message (`Outbox.delivered`);
  once every destination has, the outbox acks it in the spool and it leaves the disk.
- **in hand**: (receiver) a reliable message given to the application and not yet
  marked in dedup: a copy arriving meanwhile is a duplicate.
- **done**: (receiver) processed reliable messages waiting to be marked in dedup
  (`Dedup`), which happens before the credit that reports them.
- **dead letter**: a message that failed ``max_attempts`` times, kept in the
  dead-letter spool until replayed or purged.
- **expired**: a message whose ttl passed before a destination consumed it: never
  handed to an application, it leaves the outbox like a delivered one but is
  counted as expired, never retried or dead-lettered (`Outbox.expired`; a pusher's
  backlog, `_work._backlog`; a worker credits one that arrives late).
- **durable**: a named, per-node queue (``_durable.<node id>.<name>``) that
  publishers remember and spool for, online or not, until it is forgotten
  (`_durables`).
"""
