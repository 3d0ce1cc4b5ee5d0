"""whetstone.train"""
