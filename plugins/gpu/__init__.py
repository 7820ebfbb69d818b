"""plugins/gpu"""
