//! Typed async QMP client and QAPI migration models.
