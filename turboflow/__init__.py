"""turboflow: TurboDiffusion-class video generation served as event-driven Knative functions."""

__version__ = "0.1.0"
