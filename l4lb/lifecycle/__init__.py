"""The daemon's lifecycle rules: one instance per bpffs/state directory
(lock.py), what a start may do when the store and the pinned maps disagree
(guard.py), and rebuilding a desired state from what the maps hold
(adopt.py). Pure rules and small file operations; the datapath reads and
writes the pins."""
