"""plugins/tensorrt"""
