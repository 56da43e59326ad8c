"""The I/O shell: a libp2p node around the crdtbook core."""
