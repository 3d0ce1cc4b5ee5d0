"""whetstone.data"""
