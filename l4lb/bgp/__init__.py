"""BGP: announce the VIPs this box can serve through a real BGP speaker (BIRD 2); see reconciler.py."""
