"""raugment: grow image-classification training sets with retrieved and generated images, on Ray.

Importing the package is cheap (no torch, no ray); stages import their heavy dependencies lazily.
"""

__version__ = "0.1.0"
