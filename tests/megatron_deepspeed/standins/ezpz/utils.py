def breakpoint(rank=0):  # noqa: A001 - ezpz's name
    return None
