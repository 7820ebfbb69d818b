"""graph/passes"""
