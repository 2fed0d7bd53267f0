"""The worker processes: ingress, egress and expiry."""
