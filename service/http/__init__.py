"""The HTTP layer: the only package that imports FastAPI. It decodes, authorises and delegates."""
