"""plugins/cpu"""
