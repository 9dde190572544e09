"""splitserve.routing"""
