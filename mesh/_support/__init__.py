"""Small building blocks every part of the node uses: drop-and-count logging, mailboxes, tallies."""
