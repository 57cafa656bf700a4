"""cxr-triage: chest X-ray triage (COVID-19, Lung Opacity, Normal, Viral Pneumonia) with heatmaps and advice.

Decision support for research and education only; not a medical device.
"""

__version__ = "0.1.0"
