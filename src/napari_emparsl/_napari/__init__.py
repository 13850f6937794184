"""napari contributions: reader, writer, sample data (thin; no compute logic)."""
