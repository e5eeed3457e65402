"""What the mesh remembers: each publisher's retained value per topic, and how a new
subscription gets them before live messages, with no gap and no duplicate.
"""
