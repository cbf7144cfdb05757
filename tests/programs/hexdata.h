/*
 * hexdata.h: decoding of the HEXDATA part of the OFFSET:HEXDATA
 * arguments the test programs take, so that tests can pass any bytes,
 * newlines and NUL bytes included, on a command line.
 */
#ifndef HEXDATA_H
#define HEXDATA_H

#include <stdlib.h>
#include <string.h>

static int hexdata_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/*
 * Decodes hex (two digits a byte) into a new buffer in *out; returns
 * its length, or -1 for an odd length, a bad digit or no memory.
 */
static long hexdata_decode(const char *hex, unsigned char **out)
{
    size_t n = strlen(hex) / 2;
    size_t k;

    if (strlen(hex) % 2 != 0)
        return -1;
    *out = malloc(n + 1);
    if (*out == NULL)
        return -1;
    for (k = 0; k < n; k++) {
        int hi = hexdata_digit(hex[2 * k]);
        int lo = hexdata_digit(hex[2 * k + 1]);

        if (hi < 0 || lo < 0) {
            free(*out);
            return -1;
        }
        (*out)[k] = (unsigned char)(hi << 4 | lo);
    }

    return (long)n;
}

#endif /* HEXDATA_H */
