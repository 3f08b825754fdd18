import sys
def main(argv=None):
    print("0.1.0"); return 0
if __name__ == "__main__":
    sys.exit(main())
