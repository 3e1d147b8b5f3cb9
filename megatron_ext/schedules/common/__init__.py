"""Shared by the LR schedule plug-ins (not plug-ins): the scheduler every decay style runs in, and
the bases of the infinite and stable-then-cooldown styles."""
