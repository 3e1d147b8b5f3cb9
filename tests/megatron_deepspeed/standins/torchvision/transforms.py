def __getattr__(name):
    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: transforms.{name} is not available in the test harness")

    return unavailable
