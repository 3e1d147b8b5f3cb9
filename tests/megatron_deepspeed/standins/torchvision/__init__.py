"""Stand-in for torchvision (test harness): the names the fork's vision modules import at module
level. Using any of them for real raises."""
from torchvision import datasets, transforms  # noqa: F401


def get_image_backend():
    return "PIL"
