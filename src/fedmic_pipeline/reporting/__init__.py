"""Figures and tables for humans: built from arrays, returned as matplotlib Figures."""
