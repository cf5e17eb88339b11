"""Concrete models: exact testbeds, networks and their training. Never imported by pplalign/."""
