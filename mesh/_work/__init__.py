"""Work queues: pushers hand each message to one worker by credit; workers grant credit and pull."""
