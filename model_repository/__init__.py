"""Serving side of littlebig: the Triton model sources, the repository generator, the server launcher.

``onnx_classifier/model.py`` and ``littlebig/model.py`` are Python-backend models copied into the
generated repository; they are not imported from here.
"""
