"""Plain-Python logic of the OncoFusion 3D Slicer module: no Slicer, Qt or VTK import, unit-tested."""
