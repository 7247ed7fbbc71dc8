"""ourvidz-serve: the OurVidz image and video generation service on Ray Serve."""

__version__ = "0.1.0"
