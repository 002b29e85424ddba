//! BMP (RFC 7854): framing and route events. (Being written.)
