"""``fedloom dashboard``: a live, read-only web page of simulation run folders and deployed servers' state."""
