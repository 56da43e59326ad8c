"""The crdtbook command-line interface."""
