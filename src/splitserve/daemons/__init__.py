"""splitserve.daemons"""
